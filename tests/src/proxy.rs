//! A TCP proxy that cuts the network: forwards every connection to a target and, once the first
//! connection (`start`) or all connections together (`start_counting_all`: a migration with
//! data connections) have carried `cut_after` bytes from client to server, shuts every
//! connection down at once (both directions), as a failed link would. Migration fault tests put
//! it between the source and the destination.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct CutProxy {
    pub addr: SocketAddr,
    /// Bytes the first connection (or all, see `start_counting_all`) carried client -> server
    /// before the cut (or so far).
    pub forwarded: Arc<AtomicU64>,
    pub cut: Arc<AtomicBool>,
}

impl CutProxy {
    pub fn start(target: SocketAddr, cut_after: u64) -> CutProxy {
        Self::start_with(target, cut_after, false)
    }

    /// Counts the bytes of every connection towards `cut_after`.
    pub fn start_counting_all(target: SocketAddr, cut_after: u64) -> CutProxy {
        Self::start_with(target, cut_after, true)
    }

    fn start_with(target: SocketAddr, cut_after: u64, count_all: bool) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let forwarded = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let socks: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (f, c) = (forwarded.clone(), cut.clone());
        std::thread::spawn(move || {
            let mut first = true;
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    return;
                };
                if c.load(Ordering::Acquire) {
                    // After the cut nothing gets through: refuse the new connection too.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                {
                    let mut s = socks.lock().unwrap();
                    s.push(client.try_clone().unwrap());
                    s.push(server.try_clone().unwrap());
                }
                let counted = (first || count_all).then(|| (f.clone(), cut_after));
                first = false;
                pump(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    counted,
                    c.clone(),
                    socks.clone(),
                );
                pump(server, client, None, c.clone(), socks.clone());
            }
        });
        CutProxy {
            addr,
            forwarded,
            cut,
        }
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    counted: Option<(Arc<AtomicU64>, u64)>,
    cut: Arc<AtomicBool>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if cut.load(Ordering::Acquire) {
                return;
            }
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => n,
            };
            let mut n = n;
            let mut cut_now = false;
            if let Some((count, limit)) = &counted {
                // Several connections may share the count: each takes what is left of it
                // atomically, so no more than `limit` bytes pass in all.
                let before = count
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                        Some((b + n as u64).min(*limit))
                    })
                    .unwrap_or(*limit);
                let granted = (before + n as u64).min(*limit) - before.min(*limit);
                if before + n as u64 >= *limit {
                    cut_now = true;
                }
                n = granted as usize;
            }
            if n > 0 && to.write_all(&buf[..n]).is_err() {
                return;
            }
            if cut_now {
                cut.store(true, Ordering::Release);
                // Shut every connection down and close this side of it: a peer that sends more
                // is reset, as by a failed link. (Keeping the sockets open, only shut down,
                // would leave a sender blocked on a zero window instead: a silent peer, which
                // is another fault than a cut.)
                let mut all = socks.lock().unwrap_or_else(|p| p.into_inner());
                for s in all.iter() {
                    let _ = s.shutdown(Shutdown::Both);
                }
                all.clear();
                return;
            }
        }
    });
}
