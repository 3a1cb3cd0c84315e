//! A TCP proxy on loopback that a test can cut and restore: a network blip
//! between an agent and the coordinator without restarting either.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct State {
    cut: bool,
    connections: Vec<AbortHandle>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Runs the forwarding until the proxy is dropped.
    _runtime: tokio::runtime::Runtime,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        runtime.spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut guard = shared.lock().expect("proxy state");
                if guard.cut {
                    continue; // Dropped: the connection is refused by closing.
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                guard.connections.push(task.abort_handle());
            }
        });
        Self {
            addr,
            state,
            _runtime: runtime,
        }
    }

    /// Drops every connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        let mut state = self.state.lock().expect("proxy state");
        state.cut = true;
        for conn in state.connections.drain(..) {
            conn.abort();
        }
    }

    pub fn restore(&self) {
        self.state.lock().expect("proxy state").cut = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}
