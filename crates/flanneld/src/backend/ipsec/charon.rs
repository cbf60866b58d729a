//! strongSwan's IKE daemon `charon`: found where the reference looks for it, started as our
//! child (or a running one used), watched, and restarted when it dies.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::vici::{Client, ViciError};

/// Where the reference looks for charon, in order (`charon` = the `PATH`).
pub const SEARCH_PATHS: [&str; 5] = [
    "charon",
    "/usr/lib/strongswan/charon",
    "/usr/lib/ipsec/charon",
    "/usr/libexec/strongswan/charon",
    "/usr/libexec/ipsec/charon",
];

/// How long a freshly started charon may take to answer on its VICI socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A charon failure.
#[derive(Debug, thiserror::Error)]
pub enum CharonError {
    /// No executable at any of [`SEARCH_PATHS`] (the reference's text).
    #[error("no valid charon executable found at paths [{}]", SEARCH_PATHS.join(" "))]
    NotFound,
    /// The executable could not be started.
    #[error("Error starting charon daemon: {0}")]
    Spawn(std::io::Error),
    /// charon exited before it served VICI.
    #[error("charon exited ({status}) before serving {socket}")]
    ExitedEarly {
        /// Its exit status.
        status: ExitStatus,
        /// The socket it should have opened.
        socket: PathBuf,
    },
    /// charon runs but never answered on its socket.
    #[error("charon did not answer on {socket} within {timeout:?}: {last}")]
    NoAnswer {
        /// The socket.
        socket: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// The last connection error.
        last: ViciError,
    },
    /// Talking to charon failed.
    #[error(transparent)]
    Vici(#[from] ViciError),
}

/// Whether `p` is an executable regular file.
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The charon executable: the first of [`SEARCH_PATHS`] that exists (bare `charon` through
/// `PATH`), warning about each miss as the reference does.
pub fn find_exec_path() -> Result<PathBuf, CharonError> {
    for p in SEARCH_PATHS {
        let found = if p.contains('/') {
            Some(PathBuf::from(p)).filter(|p| is_executable(p))
        } else {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join(p))
                    .find(|c| is_executable(c))
            })
        };
        match found {
            Some(f) => return Ok(f),
            None => tracing::warn!("no valid charon executable found at path {p}"),
        }
    }
    Err(CharonError::NotFound)
}

/// The IKE daemon flanneld talks to.
pub struct Charon {
    socket: PathBuf,
    /// The charon we started (none when a running one is used).
    child: Option<Child>,
    /// A connection held open to the daemon: it breaks exactly when that daemon goes, so a
    /// restarted daemon (ours or someone's) is never mistaken for the one we configured.
    monitor: Option<Client>,
}

impl Charon {
    /// Uses the charon answering on `socket`, or starts one and waits until it answers.
    pub async fn start(socket: &Path) -> Result<Charon, CharonError> {
        let mut c = Charon {
            socket: socket.to_path_buf(),
            child: None,
            monitor: None,
        };
        if let Ok((client, version)) = c.probe().await {
            tracing::info!(
                "Using the charon daemon that answers on {} ({version})",
                socket.display()
            );
            c.monitor = Some(client);
            return Ok(c);
        }
        c.spawn().await?;
        Ok(c)
    }

    /// The VICI socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A new VICI connection.
    pub async fn client(&self) -> Result<Client, ViciError> {
        Client::connect(&self.socket).await
    }

    /// The pid of the charon we started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A connection to the daemon that answered `version`, and that version.
    async fn probe(&self) -> Result<(Client, String), ViciError> {
        let mut c = self.client().await?;
        let v = c.version().await?;
        Ok((c, v))
    }

    /// Starts charon as our child (SIGTERM to it when flanneld dies, its output on ours) and
    /// waits for its VICI socket.
    async fn spawn(&mut self) -> Result<(), CharonError> {
        let exec = find_exec_path()?;
        let mut cmd = Command::new(&exec);
        cmd.stdin(Stdio::null());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(CharonError::Spawn)?;
        tracing::info!(
            "Charon daemon started ({}, pid {})",
            exec.display(),
            child.id()
        );
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(CharonError::ExitedEarly {
                    status,
                    socket: self.socket.clone(),
                });
            }
            match self.probe().await {
                Ok((client, version)) => {
                    tracing::info!("charon answers on {} ({version})", self.socket.display());
                    self.monitor = Some(client);
                    return Ok(());
                }
                Err(e) if started.elapsed() > START_TIMEOUT => {
                    return Err(CharonError::NoAnswer {
                        socket: self.socket.clone(),
                        timeout: START_TIMEOUT,
                        last: e,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Makes sure a charon runs and tells whether it is a new one since the last call (then
    /// every key and connection must be loaded again): our charon exited -> started again; the
    /// held connection broke but the socket answers -> a daemon restarted by someone; a used
    /// (not ours) daemon no longer answers -> ours is started.
    pub async fn ensure_running(&mut self) -> Result<bool, CharonError> {
        if let Some(m) = self.monitor.as_mut() {
            match m.version().await {
                Ok(_) => return Ok(false),
                Err(e) => {
                    tracing::warn!("lost the connection to charon: {e}");
                    self.monitor = None;
                }
            }
        }
        // Ours is dying or dead: reap it (a killed process takes a moment) and start another.
        if self.child.is_some() {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let exited = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    tracing::warn!("charon exited ({status}); restarting it");
                    self.child = None;
                    self.spawn().await?;
                    return Ok(true);
                }
                if Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        match self.probe().await {
            Ok((client, version)) => {
                tracing::warn!(
                    "charon ({version}) answers again on {}",
                    self.socket.display()
                );
                self.monitor = Some(client);
                Ok(true)
            }
            Err(e) if self.child.is_none() => {
                tracing::warn!(
                    "charon does not answer on {} ({e}); starting our own",
                    self.socket.display()
                );
                self.spawn().await?;
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Charon {
    /// SIGTERM to the charon we started (it closes its SAs), reaped within a few seconds.
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child has no memory-safety preconditions.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                tracing::info!("Stopped charon daemon");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}
