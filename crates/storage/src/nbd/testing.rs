//! Real NBD servers for tests (feature `testing`): qemu-nbd and nbdkit as child processes
//! on a unix socket or a loopback TCP port, killed when dropped.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where a test server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    /// Loopback TCP on this port.
    Tcp(u16),
}

impl Listen {
    /// A free loopback port (bound and released; the server binds it right after).
    pub fn free_tcp() -> io::Result<Listen> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        Ok(Listen::Tcp(l.local_addr()?.port()))
    }

    /// The URI of `export` on this address.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Listen::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            Listen::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
        }
    }
}

/// A running NBD server.
#[derive(Debug)]
pub struct NbdServer {
    child: Option<Child>,
    pub listen: Listen,
    what: String,
}

impl NbdServer {
    /// `qemu-nbd` serving `image` (raw) persistently, with `extra` arguments (e.g.
    /// `["-e", "4"]` to allow several clients, which also advertises multi-conn).
    pub fn qemu_nbd(image: &Path, listen: Listen, extra: &[&str]) -> io::Result<NbdServer> {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-t", "--discard=unmap", "--cache=writeback"]);
        match &listen {
            Listen::Unix(p) => {
                cmd.arg("-k").arg(p);
            }
            Listen::Tcp(port) => {
                cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
            }
        }
        cmd.args(extra).arg(image);
        Self::spawn(cmd, listen, "qemu-nbd")
    }

    /// `nbdkit` in the foreground with `args` (plugin, filters, parameters).
    pub fn nbdkit(listen: Listen, args: &[&str]) -> io::Result<NbdServer> {
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--exit-with-parent"]);
        match &listen {
            Listen::Unix(p) => {
                cmd.arg("-U").arg(p);
            }
            Listen::Tcp(port) => {
                cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
            }
        }
        cmd.args(args);
        Self::spawn(cmd, listen, "nbdkit")
    }

    fn spawn(mut cmd: Command, listen: Listen, what: &str) -> io::Result<NbdServer> {
        if let Listen::Unix(p) = &listen {
            let _ = std::fs::remove_file(p);
        }
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn()?;
        let mut server = NbdServer {
            child: Some(child),
            listen,
            what: what.to_string(),
        };
        server.wait_listening()?;
        Ok(server)
    }

    fn wait_listening(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match &self.listen {
                Listen::Unix(p) => UnixStream::connect(p).is_ok(),
                Listen::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            };
            if up {
                return Ok(());
            }
            if let Some(child) = &mut self.child {
                if let Some(status) = child.try_wait()? {
                    return Err(io::Error::other(format!("{} exited: {status}", self.what)));
                }
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{} did not start listening",
                    self.what
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URI of `export` on this server.
    pub fn uri(&self, export: &str) -> String {
        self.listen.uri(export)
    }

    /// Kills the server (SIGKILL, as a crash) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
