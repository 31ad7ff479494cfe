//! How a client reaches a xenstore daemon: the daemon's unix socket, or the
//! Linux kernel's `/dev/xen/xenbus` character device.
//!
//! Both carry the same framing (xs_wire.h header + payload). The device keeps
//! message boundaries on its side (it accumulates a request until complete and
//! queues whole replies), and reading it in pieces works, so one stream reader
//! serves both. We always hand a whole message to a single `write` call, which
//! both transports prefer.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Where C xenstored and oxenstored listen by default.
pub const DEFAULT_SOCKET_PATH: &str = "/run/xenstored/socket";
/// The Linux xenbus device (in dom0 and in guests).
pub const DEFAULT_XENBUS_DEVICE: &str = "/dev/xen/xenbus";

/// A connected transport, before the client splits it into reader and writer.
#[derive(Debug)]
pub enum Transport {
    /// A stream socket to xenstored (or to the in-memory server).
    Unix(UnixStream),
    /// An open `/dev/xen/xenbus` (read/write).
    XenbusDevice(File),
}

impl Transport {
    /// Connects to a xenstored unix socket.
    pub fn connect_unix(path: impl AsRef<Path>) -> io::Result<Transport> {
        UnixStream::connect(path).map(Transport::Unix)
    }

    /// Opens the xenbus character device for reading and writing.
    pub fn open_xenbus_device(path: impl AsRef<Path>) -> io::Result<Transport> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(Transport::XenbusDevice)
    }

    /// Splits into an owned reader (for the reader thread), an owned writer
    /// (shared under a lock by requesters) and a handle used to stop the
    /// reader.
    pub(crate) fn split(self) -> io::Result<(TransportReader, TransportWriter, Closer)> {
        Ok(match self {
            Transport::Unix(s) => (
                TransportReader::Unix(s.try_clone()?),
                TransportWriter::Unix(s.try_clone()?),
                Closer::Unix(s),
            ),
            Transport::XenbusDevice(f) => (
                TransportReader::Device(f.try_clone()?),
                TransportWriter::Device(f),
                Closer::Device,
            ),
        })
    }
}

/// The reading half.
#[derive(Debug)]
pub(crate) enum TransportReader {
    Unix(UnixStream),
    Device(File),
}

impl Read for TransportReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            TransportReader::Unix(s) => s.read(buf),
            TransportReader::Device(f) => f.read(buf),
        }
    }
}

/// The writing half.
#[derive(Debug)]
pub(crate) enum TransportWriter {
    Unix(UnixStream),
    Device(File),
}

impl Write for TransportWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            TransportWriter::Unix(s) => s.write(buf),
            TransportWriter::Device(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            TransportWriter::Unix(s) => s.flush(),
            TransportWriter::Device(f) => f.flush(),
        }
    }
}

/// Stops the reader thread when the client goes away.
#[derive(Debug)]
pub(crate) enum Closer {
    Unix(UnixStream),
    /// A character device cannot be shut down; the client instead sends one
    /// last harmless request whose reply wakes the reader (see `XsClient`'s
    /// `Drop`).
    Device,
}

impl Closer {
    /// Wakes a reader blocked in `read`. Returns false if this transport
    /// cannot do that by itself.
    pub(crate) fn shutdown(&self) -> bool {
        match self {
            Closer::Unix(s) => {
                let _ = s.shutdown(Shutdown::Both);
                true
            }
            Closer::Device => false,
        }
    }
}
