//! What the network between the two namespaces can do, measured in-process: threads moved into
//! each namespace talk over the veth pair. Raw throughput of one TCP connection, and the
//! round-trip time of a 4 KiB request answered by 4 KiB (the shape of a postcopy page fault).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use vmm_tests::netns::{enter_namespace, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("namespace: {0}")]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the {0} thread panicked")]
    Thread(&'static str),
    #[error("the server thread never reported its address")]
    NoServer,
    #[error("received {got} bytes, sent {sent}")]
    Short { got: u64, sent: u64 },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> BaselineError {
    move |source| BaselineError::Io { what, source }
}

#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// One connection a -> b, `mib` MiB written in 1 MiB writes, until the receiver has read all.
    pub tcp_mib: u64,
    pub tcp_mib_s: f64,
    /// 4 KiB request, 4 KiB response, TCP_NODELAY, one connection a -> b.
    pub rtt_samples: usize,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
}

/// Runs `server` on a thread inside `ns_b` listening on `addr_b`, returns its address and handle.
fn serve<T: Send + 'static>(
    ns_b: &str,
    addr_b: Ipv4Addr,
    server: impl FnOnce(TcpStream) -> Result<T, BaselineError> + Send + 'static,
) -> Result<(SocketAddr, thread::JoinHandle<Result<T, BaselineError>>), BaselineError> {
    let ns_b = ns_b.to_string();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let setup = || -> Result<TcpListener, BaselineError> {
            enter_namespace(&ns_b)?;
            TcpListener::bind((addr_b, 0)).map_err(io("bind in namespace b"))
        };
        let listener = match setup() {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(None);
                return Err(e);
            }
        };
        let _ = tx.send(listener.local_addr().ok());
        let (conn, _) = listener.accept().map_err(io("accept"))?;
        conn.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io("read timeout"))?;
        server(conn)
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Some(addr)) => Ok((addr, handle)),
        _ => match handle.join() {
            Ok(Err(e)) => Err(e),
            _ => Err(BaselineError::NoServer),
        },
    }
}

/// Runs `client` on a thread inside `ns_a`.
fn client<T: Send + 'static>(
    ns_a: &str,
    addr: SocketAddr,
    f: impl FnOnce(TcpStream) -> Result<T, BaselineError> + Send + 'static,
) -> Result<T, BaselineError> {
    let ns_a = ns_a.to_string();
    thread::spawn(move || {
        enter_namespace(&ns_a)?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(io("connect from namespace a"))?;
        s.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io("read timeout"))?;
        f(s)
    })
    .join()
    .map_err(|_| BaselineError::Thread("client"))?
}

/// Where the receiving end of a raw copy puts what it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// One reused 1 MiB buffer: the link alone (what iperf measures).
    Discard,
    /// Written on into a fresh memfd, as a migration's destination writes guest RAM: the link
    /// plus the cost of memory nothing has touched yet (on these nested hosts, large: the outer
    /// host takes freed memory back, so each new page faults twice).
    FreshMemory,
}

/// MiB/s of one TCP connection from a to b, the receiver doing `sink` with what it reads.
pub fn throughput(
    ns_a: &str,
    ns_b: &str,
    addr_b: Ipv4Addr,
    mib: u64,
    sink: Sink,
) -> Result<f64, BaselineError> {
    let (addr, server) = serve(ns_b, addr_b, move |mut conn| {
        let ram = match sink {
            Sink::Discard => None,
            // Made before the sender starts (the connection is accepted): only the writes are
            // timed, as on a migration's destination, whose RAM exists before pages arrive.
            Sink::FreshMemory => Some(
                vmm_lib::memory::GuestRam::new((mib << 20).max(vmm_lib::memory::MIN_MEM_BYTES))
                    .map_err(|e| io("fresh memory")(std::io::Error::other(e.to_string())))?,
            ),
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = conn.read(&mut buf).map_err(io("receive"))?;
            if n == 0 {
                break;
            }
            if let Some(ram) = &ram {
                use std::os::unix::fs::FileExt;
                ram.file()
                    .write_all_at(&buf[..n], got)
                    .map_err(io("write into fresh memory"))?;
            }
            got += n as u64;
        }
        conn.write_all(&[1]).map_err(io("acknowledge"))?;
        Ok(got)
    })?;
    let secs = client(ns_a, addr, move |mut s| {
        let buf = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        for _ in 0..mib {
            s.write_all(&buf).map_err(io("send"))?;
        }
        s.shutdown(std::net::Shutdown::Write)
            .map_err(io("shutdown"))?;
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).map_err(io("read acknowledgement"))?;
        Ok(start.elapsed().as_secs_f64())
    })?;
    let got = server
        .join()
        .map_err(|_| BaselineError::Thread("server"))??;
    if got != mib << 20 {
        return Err(BaselineError::Short {
            got,
            sent: mib << 20,
        });
    }
    Ok(mib as f64 / secs)
}

/// Round-trip times (us) of `n` 4 KiB request/response exchanges from a to b, after a warm-up.
pub fn rtt_us(
    ns_a: &str,
    ns_b: &str,
    addr_b: Ipv4Addr,
    n: usize,
) -> Result<Vec<f64>, BaselineError> {
    const PAGE: usize = 4096;
    const WARMUP: usize = 100;
    let (addr, server) = serve(ns_b, addr_b, |mut conn| {
        let mut buf = [0u8; PAGE];
        loop {
            match conn.read_exact(&mut buf) {
                Ok(()) => conn.write_all(&buf).map_err(io("respond"))?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(io("request")(e)),
            }
        }
    })?;
    let samples = client(ns_a, addr, move |mut s| {
        let req = [0xa5u8; PAGE];
        let mut resp = [0u8; PAGE];
        let mut samples = Vec::with_capacity(n);
        for i in 0..WARMUP + n {
            let t = Instant::now();
            s.write_all(&req).map_err(io("request"))?;
            s.read_exact(&mut resp).map_err(io("response"))?;
            if i >= WARMUP {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })?;
    server
        .join()
        .map_err(|_| BaselineError::Thread("server"))??;
    Ok(samples)
}

/// Both baselines once.
pub fn measure(
    ns_a: &str,
    ns_b: &str,
    addr_b: Ipv4Addr,
    mib: u64,
    rtt_n: usize,
) -> Result<Baseline, BaselineError> {
    let tcp_mib_s = throughput(ns_a, ns_b, addr_b, mib, Sink::Discard)?;
    let rtt = rtt_us(ns_a, ns_b, addr_b, rtt_n)?;
    Ok(Baseline {
        tcp_mib: mib,
        tcp_mib_s,
        rtt_samples: rtt.len(),
        rtt_p50_us: crate::stats::percentile(&rtt, 50.0).unwrap_or(f64::NAN),
        rtt_p99_us: crate::stats::percentile(&rtt, 99.0).unwrap_or(f64::NAN),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_tests::netns::{Side, TwoHosts};

    /// Both copies run between real namespaces and deliver every byte (each checks the count
    /// it received), the fresh-memory one through a memfd of the copy's size.
    #[test]
    fn both_raw_copies_move_every_byte_between_the_namespaces() {
        let hosts = TwoHosts::up(&format!("bl{}", std::process::id() % 100_000)).unwrap();
        let (a, b) = (hosts.namespace(Side::A), hosts.namespace(Side::B));
        for sink in [Sink::Discard, Sink::FreshMemory] {
            let mib_s = throughput(&a, &b, hosts.addr_b, 16, sink).unwrap();
            assert!(mib_s.is_finite() && mib_s > 0.0, "{sink:?}: {mib_s}");
        }
    }
}
