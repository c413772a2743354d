//! A TCP relay to the API server: agents in a lab node's network namespace
//! reach the control plane (on the machine's loopback) at 127.0.0.1:6443 of
//! their own namespace, as on a node where the API server is one hop away.
//! TLS passes through untouched (the server's certificate names 127.0.0.1).
//!
//! Cutting the relay's connections ([`ApiRelay::cut`]) ends every request and
//! watch of the clients behind it at once, without restarting the server:
//! what a network blip or a load balancer dropping idle streams does;
//! blocking it ([`ApiRelay::set_blocked`]) keeps them out until unblocked.

use std::{
    collections::BTreeMap,
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use weft_agent::netns::NetnsGuard;

/// The port agents in lab nodes use for the API server.
pub const NODE_API_PORT: u16 = 6443;

struct State {
    stop: AtomicBool,
    /// New connections are closed at once (the API server is unreachable).
    blocked: AtomicBool,
    /// Both ends of every open relayed connection, by a number of its own.
    open: Mutex<BTreeMap<u64, (TcpStream, TcpStream)>>,
    accepted: AtomicU64,
}

/// See the module doc. Stops (and closes every connection) when dropped.
pub struct ApiRelay {
    addr: SocketAddr,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

impl ApiRelay {
    /// Relays connections to `127.0.0.1:port` of the namespace at `netns`
    /// (None: this thread's) to `upstream` (reached from this thread's namespace).
    pub fn start(netns: Option<&Path>, port: u16, upstream: SocketAddr) -> io::Result<Self> {
        let listener = {
            let _g = netns.map(NetnsGuard::enter).transpose()?;
            TcpListener::bind(("127.0.0.1", port))?
        };
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let state = Arc::new(State {
            stop: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            open: Mutex::new(BTreeMap::new()),
            accepted: 0.into(),
        });
        let st = state.clone();
        let acceptor = std::thread::Builder::new().name("api-relay".into()).spawn(move || {
            while !st.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) if st.blocked.load(Ordering::SeqCst) => drop(client),
                    Ok((client, _)) => {
                        st.accepted.fetch_add(1, Ordering::SeqCst);
                        let _ = relay(&st, client, upstream);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
        Ok(Self { addr, state, acceptor: Some(acceptor) })
    }

    /// Where it listens (inside its namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// While blocked, every open connection is cut and new ones are closed
    /// at once: the API server is unreachable from behind the relay.
    pub fn set_blocked(&self, blocked: bool) {
        self.state.blocked.store(blocked, Ordering::SeqCst);
        if blocked {
            self.cut();
        }
    }

    /// Closes every open connection (both sides); new ones are still relayed.
    pub fn cut(&self) {
        let open = std::mem::take(&mut *self.state.open.lock().unwrap_or_else(|e| e.into_inner()));
        for (a, b) in open.into_values() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        self.cut();
    }
}

fn relay(st: &Arc<State>, client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let server = match TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            let _ = client.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let id = st.accepted.load(Ordering::SeqCst);
    st.open.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (client.try_clone()?, server.try_clone()?));
    let remaining = Arc::new(AtomicU8::new(2));
    for (mut from, mut to) in [(client.try_clone()?, server.try_clone()?), (server, client)] {
        let (st, remaining) = (st.clone(), remaining.clone());
        std::thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
            if remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
                st.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            }
        });
    }
    Ok(())
}
