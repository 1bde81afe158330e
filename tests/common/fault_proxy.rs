//! [`FaultProxy`]: a TCP proxy that sits between a store client and its
//! server and breaks the network on command: added latency, dropped
//! connections, a black hole that accepts and never answers, half-open
//! connections.
//!
//! The faults are those a network really has. TCP never loses bytes inside
//! a connection that stays up, so the proxy never drops bytes and then goes
//! on: a black hole holds them (a retransmitting network) and delivers them
//! late when it closes, unless the connection is dropped meanwhile.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The network as it is now, for every connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Weather {
    /// Added to every chunk of bytes, each way.
    latency: Duration,
    /// Bytes are held, not forwarded, and new connections are not connected
    /// upstream, until it ends.
    black_hole: bool,
    /// Bumped to drop every open connection.
    cuts: u64,
    /// Bumped to make every open connection half-open.
    half_opens: u64,
}

/// A TCP proxy to one server that injects network faults. Dropping it stops
/// it and closes its connections.
pub struct FaultProxy {
    addr: SocketAddr,
    weather: Arc<watch::Sender<Weather>>,
    accepted: Arc<AtomicUsize>,
    from_clients: Arc<AtomicUsize>,
    swallow: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free local port that forwards to `target`.
    pub async fn start(target: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let weather = Arc::new(watch::Sender::new(Weather::default()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let swallow = Arc::new(AtomicUsize::new(0));
        let from_clients = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn({
            let (weather, accepted, swallow, from_clients) = (
                weather.clone(),
                accepted.clone(),
                swallow.clone(),
                from_clients.clone(),
            );
            async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        conn = listener.accept() => {
                            let Ok((client, _)) = conn else { continue };
                            accepted.fetch_add(1, Ordering::SeqCst);
                            connections.spawn(serve(client, target, weather.subscribe(), swallow.clone(), from_clients.clone()));
                        }
                        Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    }
                }
            }
        });
        Ok(Self {
            addr,
            weather,
            accepted,
            from_clients,
            swallow,
            accept,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `redis://` URL to the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// How many chunks of bytes it read from clients so far (what a client
    /// sent has reached the proxy, whatever the proxy then does with it).
    pub fn chunks_from_clients(&self) -> usize {
        self.from_clients.load(Ordering::SeqCst)
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Adds `latency` to every chunk of bytes, each way, from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.weather.send_modify(|w| w.latency = latency);
    }

    /// Starts (`true`) or ends a black hole: while it lasts, connections are
    /// accepted but nothing is forwarded either way; what was held is
    /// delivered when it ends.
    pub fn set_black_hole(&self, on: bool) {
        self.weather.send_modify(|w| w.black_hole = on);
    }

    /// Drops every open connection, both sides (as a reset would).
    pub fn drop_connections(&self) {
        self.weather.send_modify(|w| w.cuts += 1);
    }

    /// Makes every open connection half-open: the server's side is closed,
    /// and the client's side stays open, takes what it is sent and never
    /// answers (a peer that vanished without a word).
    pub fn half_open(&self) {
        self.weather.send_modify(|w| w.half_opens += 1);
    }

    /// The next `answers` times the server answers, the answer is thrown
    /// away and the client's connection closed: the server did the work,
    /// the client never hears of it.
    pub fn swallow_answers(&self, answers: usize) {
        self.swallow.store(answers, Ordering::SeqCst);
    }

    /// Ends every fault: no latency, no black hole.
    pub fn heal(&self) {
        self.weather.send_modify(|w| {
            w.latency = Duration::ZERO;
            w.black_hole = false;
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Serves one client connection until either side closes it or a fault
/// ends it.
async fn serve(
    client: TcpStream,
    target: SocketAddr,
    mut weather: watch::Receiver<Weather>,
    swallow: Arc<AtomicUsize>,
    from_clients: Arc<AtomicUsize>,
) {
    let start = *weather.borrow_and_update();
    // A black hole: the client's connection is accepted, the server's waits.
    if weather.wait_for(|w| !w.black_hole).await.is_err() {
        return;
    }
    if weather.borrow().cuts != start.cuts {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (mut up, mut down, mut faults) = (weather.clone(), weather.clone(), weather);
    let half_open = tokio::select! {
        _ = pump(&mut client_read, &mut server_write, &mut up, Some(&from_clients), None) => false,
        _ = pump(&mut server_read, &mut client_write, &mut down, None, Some(&swallow)) => false,
        half_open = faults.wait_for(|w| w.cuts != start.cuts || w.half_opens != start.half_opens) => {
            matches!(half_open, Ok(w) if w.cuts == start.cuts)
        }
    };
    if half_open {
        // The server's side goes; the client's stays open and unanswered
        // until the client closes it or the connection is dropped.
        drop((server_read, server_write));
        let mut sink = [0u8; 4096];
        tokio::select! {
            _ = async { while matches!(client_read.read(&mut sink).await, Ok(n) if n > 0) {} } => {}
            _ = faults.wait_for(|w| w.cuts != start.cuts) => {}
        }
        drop(client_write);
    }
}

/// Copies bytes from `from` to `to`, holding them during a black hole and
/// delaying each chunk by the latency, until `from` ends or fails; counts
/// the chunks it reads in `read`, and drops the connection at an answer to
/// `swallow`.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    weather: &mut watch::Receiver<Weather>,
    read: Option<&AtomicUsize>,
    swallow: Option<&AtomicUsize>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if let Some(read) = read {
            read.fetch_add(1, Ordering::SeqCst);
        }
        // An answer to swallow: drop it and the connection.
        if swallow.is_some_and(|s| {
            s.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        }) {
            return;
        }
        let latency = weather.borrow().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if weather.wait_for(|w| !w.black_hole).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
