//! A throwaway PostgreSQL cluster from the local PostgreSQL binaries, for
//! `postbox demo`, the benchmark (tools/bench) and the tests when
//! `DATABASE_URL` is unset.
//!
//! `initdb` and `postgres` refuse to run as root, so when this process is
//! root the cluster runs as the `postgres` user. The server is started under
//! a small shell that stops it (fast shutdown) as soon as this process's end
//! of a pipe closes, so the cluster goes away with the process that made it,
//! even if that process is killed.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running throwaway cluster. Dropping it stops the server and deletes
/// its files.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    port: u16,
    guard: Option<Child>,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    durability: Durability,
}

/// Server settings for the throwaway cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// PostgreSQL's defaults (fsync on, synchronous commit): for benchmarks.
    Default,
    /// fsync off: fast, for demos and tests.
    Fast,
}

fn bin_dir() -> io::Result<PathBuf> {
    if let Ok(dir) = std::env::var("POSTBOX_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    installed_versions().pop().map(|(_, p)| p).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no PostgreSQL server binaries found (install postgresql, or set POSTBOX_PG_BIN or DATABASE_URL)",
        )
    })
}

/// The PostgreSQL server versions installed under /usr/lib/postgresql
/// (Debian's layout), oldest first, with their `bin` directories.
pub fn installed_versions() -> Vec<(u32, PathBuf)> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
}

/// The uid and gid to run the server as: ours, or `postgres`'s when we are root.
fn server_user() -> io::Result<Option<(u32, u32)>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    if uid != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"postgres")).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
        })
        .map(Some)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "running as root and there is no postgres user"))
}

fn run_as(cmd: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = user {
        cmd.gid(gid).uid(uid);
    }
    cmd
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Cluster {
    /// Creates and starts a cluster; returns once it accepts connections.
    pub fn start(durability: Durability) -> io::Result<Cluster> {
        Self::start_with(bin_dir()?, durability)
    }

    /// [`Cluster::start`] with the server binaries in `bin`.
    pub fn start_with(bin: PathBuf, durability: Durability) -> io::Result<Cluster> {
        let user = server_user()?;
        let dir = std::env::temp_dir().join(format!("postbox-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let mut cluster = Cluster {
            dir: dir.clone(),
            port: 0,
            guard: None,
            bin: bin.clone(),
            user,
            durability,
        };
        let data = dir.join("data");
        let out = run_as(&mut Command::new(bin.join("initdb")), user)
            .args([
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        for _ in 0..5 {
            cluster.port = free_port()?;
            if cluster.spawn()? {
                return Ok(cluster);
            }
        }
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        Err(io::Error::other(format!("postgres did not start: {log}")))
    }

    /// Starts the server on `self.port`; false if it did not come up.
    fn spawn(&mut self) -> io::Result<bool> {
        let fsync = match self.durability {
            Durability::Default => "on",
            Durability::Fast => "off",
        };
        let port = self.port;
        let _ = std::fs::remove_file(self.dir.join("server.log"));
        // The shell keeps the server as its child and stops it (fast
        // shutdown) when our end of its stdin closes: on drop, exit, or a
        // kill of this process.
        let script = format!(
            "\"$0\" -D \"$1\" -p {port} -k \"$2\" -c listen_addresses=127.0.0.1 -c fsync={fsync} \
             -c full_page_writes={fsync} -c max_connections=300 -c shared_buffers=256MB \
             >\"$2/server.log\" 2>&1 & pid=$!; cat >/dev/null; kill -INT $pid; wait $pid"
        );
        let postgres = self.bin.join("postgres");
        let data = self.dir.join("data");
        let child = run_as(&mut Command::new("sh"), self.user)
            .args([
                "-c",
                &script,
                path_str(&postgres)?,
                path_str(&data)?,
                path_str(&self.dir)?,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        self.guard = Some(child);
        if self.wait_ready(Duration::from_secs(30)) {
            return Ok(true);
        }
        self.stop();
        Ok(false)
    }

    /// Restarts the server: a fast shutdown, then a start on the same port,
    /// as `pg_ctl restart -m fast` would. Open connections break.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        if self.spawn()? {
            Ok(())
        } else {
            Err(io::Error::other("postgres did not come back after a restart"))
        }
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Some(Ok(Some(_))) = self.guard.as_mut().map(Child::try_wait) {
                return false;
            }
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            if log.contains("ready to accept connections") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.guard.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

fn path_str(p: &Path) -> io::Result<&str> {
    p.to_str()
        .ok_or_else(|| io::Error::other("temporary directory path is not UTF-8"))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
