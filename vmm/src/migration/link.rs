//! One migration connection, plain TCP or TLS, split the way the migration uses it: a reader
//! half and a writer half owned by different threads (`try_clone`), and a third handle that only
//! sets timeouts or shuts the socket down to wake a blocked reader.
//!
//! This host's kernel has no kTLS, so TLS runs in userland (rustls) over one shared
//! `rustls::Connection`. Its lock is never held across socket I/O:
//!
//! - a read takes ciphertext from the socket without the connection's lock (a reader blocked
//!   waiting for the peer never blocks the writer), then locks it to decrypt;
//! - a write takes the write mutex (record order), locks the connection to encrypt into a
//!   buffer, unlocks it, and sends the buffer;
//! - lock order is always write mutex, then connection.
//!
//! A close_notify or a bare EOF both read as EOF: the migration protocol has its own ends
//! (`Complete`, numbered and checksummed frames), so a truncated stream is caught there, and
//! `shutdown` (used to wake a blocked reader) sends no close_notify that could block.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Plaintext encrypted per write: bounds the ciphertext buffered before it goes to the socket.
const WRITE_CHUNK: usize = 256 << 10;
/// Ciphertext read from the socket at once.
const READ_CHUNK: usize = 256 << 10;

/// A migration connection (or one half of it; see the module comment).
pub struct Link {
    sock: TcpStream,
    tls: Option<Arc<Tls>>,
}

struct Tls {
    conn: Mutex<rustls::Connection>,
    /// Held for a whole write, encryption and send: records reach the socket in the order
    /// they were encrypted. Holds the ciphertext buffer, reused.
    write: Mutex<Vec<u8>>,
    /// Held for a whole read: ciphertext is fed to rustls in the order it arrived.
    read: Mutex<ReadBuf>,
}

struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked holder leaves at worst a broken stream, which the next frame check reports.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Link {
    /// Plain TCP (`--insecure`).
    pub fn plain(sock: TcpStream) -> Link {
        Link { sock, tls: None }
    }

    /// A TLS connection whose handshake is complete.
    pub(super) fn tls(sock: TcpStream, mut conn: rustls::Connection) -> Link {
        // Each write drains what it encrypted at once: no limit needed on rustls' own buffer.
        conn.set_buffer_limit(None);
        Link {
            sock,
            tls: Some(Arc::new(Tls {
                conn: Mutex::new(conn),
                write: Mutex::new(Vec::new()),
                read: Mutex::new(ReadBuf {
                    buf: vec![0; READ_CHUNK],
                    start: 0,
                    end: 0,
                }),
            })),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Another handle on the same connection (and the same TLS session).
    pub fn try_clone(&self) -> io::Result<Link> {
        Ok(Link {
            sock: self.sock.try_clone()?,
            tls: self.tls.clone(),
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_write_timeout(t)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.sock.set_nodelay(on)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock.peer_addr()
    }

    /// Shuts the socket down (wakes a reader blocked on it). No close_notify: see the module
    /// comment.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.sock.shutdown(how)
    }
}

impl Tls {
    /// Sends what rustls wants to send on its own (an alert, a KeyUpdate answer).
    fn send_pending(&self, sock: &TcpStream) -> io::Result<()> {
        let t = self;
        let mut out = lock(&t.write);
        out.clear();
        {
            let mut c = lock(&t.conn);
            while c.wants_write() {
                c.write_tls(&mut *out)?;
            }
        }
        (&*sock).write_all(&out)
    }

    fn read(&self, sock: &TcpStream, into: &mut [u8]) -> io::Result<usize> {
        let t = self;
        let mut rb = lock(&t.read);
        loop {
            {
                let mut c = lock(&t.conn);
                match c.reader().read(into) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The peer closed without close_notify: EOF, as on plain TCP.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if rb.start < rb.end {
                    let ReadBuf { buf, start, end } = &mut *rb;
                    let n = c.read_tls(&mut &buf[*start..*end])?;
                    *start += n;
                    let state = c.process_new_packets();
                    let wants_write = c.wants_write();
                    drop(c);
                    if wants_write {
                        // An error's alert is best effort: the error is what counts.
                        let sent = t.send_pending(sock);
                        if state.is_ok() {
                            sent?;
                        }
                    }
                    state.map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, super::tls::describe(&e))
                    })?;
                    continue;
                }
            }
            // Nothing left to decrypt: wait for the peer without the connection's lock.
            let n = (&*sock).read(&mut rb.buf)?;
            if n == 0 {
                // Tells rustls the transport ended; the next reader() call says how.
                lock(&t.conn).read_tls(&mut io::empty())?;
            }
            rb.start = 0;
            rb.end = n;
        }
    }

    fn write(&self, sock: &TcpStream, data: &[u8]) -> io::Result<usize> {
        let t = self;
        let n = data.len().min(WRITE_CHUNK);
        let mut out = lock(&t.write);
        out.clear();
        {
            let mut c = lock(&t.conn);
            let mut done = 0;
            while done < n {
                let k = c.writer().write(&data[done..n])?;
                if k == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "TLS refused more plaintext",
                    ));
                }
                done += k;
                while c.wants_write() {
                    c.write_tls(&mut *out)?;
                }
            }
        }
        (&*sock).write_all(&out)?;
        Ok(n)
    }
}

impl Read for Link {
    fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        match &self.tls {
            None => self.sock.read(into),
            Some(t) => t.read(&self.sock, into),
        }
    }
}

impl Write for Link {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match &self.tls {
            None => self.sock.write(data),
            Some(_) if data.is_empty() => Ok(0),
            Some(t) => t.write(&self.sock, data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write reached the socket whole: nothing is buffered here.
        self.sock.flush()
    }
}
