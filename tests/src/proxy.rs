//! A stand-in for the node proxy that forwards: a transparent listener that
//! splices each connection to a fixed upstream. For latency comparisons
//! before (and beside) real Envoy.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::Arc,
    thread::JoinHandle,
};

use weft_agent::netns::{self, NetnsGuard};

use crate::http::listen_in;

/// A forwarding proxy; stops when dropped.
pub struct Forwarder {
    listener: Arc<TcpListener>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on `bind` (IP_TRANSPARENT) in namespace `ns`; connections to it
    /// are forwarded to `upstream` (connected from the same namespace).
    pub fn start(ns: &str, bind: SocketAddr, upstream: SocketAddr) -> io::Result<Self> {
        let listener = Arc::new(listen_in(ns, bind, true)?);
        let ns = ns.to_owned();
        let l = listener.clone();
        let thread = std::thread::spawn(move || {
            while let Ok((down, _)) = l.accept() {
                let up = {
                    let Ok(_g) = NetnsGuard::enter(&netns::named(&ns)) else { return };
                    TcpStream::connect(upstream)
                };
                let Ok(up) = up else { continue };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                splice(down, up);
            }
        });
        Ok(Self { listener, thread: Some(thread) })
    }

    /// The listener (to register with the datapath).
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }
}

fn splice(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    std::thread::spawn(move || pipe(a, b));
    std::thread::spawn(move || pipe(b2, a2));
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // SAFETY: shutdown on a valid socket wakes accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
