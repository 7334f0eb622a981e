//! A TCP proxy that cuts the network: forwards every connection to a target and, once the first
//! connection has carried `cut_after` bytes from client to server, shuts every connection down
//! at once (both directions), as a failed link would. Migration fault tests put it between the
//! source and the destination.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct CutProxy {
    pub addr: SocketAddr,
    /// Bytes the first connection carried client -> server before the cut (or so far).
    pub forwarded: Arc<AtomicU64>,
    pub cut: Arc<AtomicBool>,
}

impl CutProxy {
    pub fn start(target: SocketAddr, cut_after: u64) -> CutProxy {
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
                let counted = first.then(|| (f.clone(), cut_after));
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
                let before = count.load(Ordering::Acquire);
                if before + n as u64 >= *limit {
                    n = (*limit - before.min(*limit)) as usize;
                    cut_now = true;
                }
                count.fetch_add(n as u64, Ordering::AcqRel);
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
