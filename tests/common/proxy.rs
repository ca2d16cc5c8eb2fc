//! A TCP proxy between the daemon and a real broker that the test can cut:
//! `cut()` drops every open connection, `set_down(true)` refuses new ones.
//! In chaos mode (`start_chaos`) it also delays every chunk a little and
//! ends each connection after a short random life, half of them with a
//! reset (RST), half with a plain close, until `calm()`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    chaos: Arc<AtomicBool>,
    /// Connections ended by chaos (reset or closed).
    pub broken: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

/// Copies one direction, each chunk after a random delay of up to 5 ms.
async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tokio::time::sleep(Duration::from_micros(fastrand::u64(..5000))).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

async fn chaotic(
    inbound: TcpStream,
    outbound: TcpStream,
    chaos: Arc<AtomicBool>,
    broken: Arc<AtomicUsize>,
) {
    let reset = fastrand::bool();
    if reset {
        // Closing with linger 0 sends RST instead of FIN.
        let _ = socket2::SockRef::from(&inbound).set_linger(Some(Duration::ZERO));
        let _ = socket2::SockRef::from(&outbound).set_linger(Some(Duration::ZERO));
    }
    let life = Duration::from_millis(300 + fastrand::u64(..1200));
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    let both = futures_util::future::join(pump(ri, wo), pump(ro, wi));
    tokio::pin!(both);
    tokio::select! {
        _ = &mut both => {}
        () = tokio::time::sleep(life) => {
            if chaos.load(Ordering::SeqCst) {
                broken.fetch_add(1, Ordering::SeqCst);
                return; // dropping both halves ends the connection
            }
            both.await;
        }
    }
}

impl Proxy {
    pub async fn start(target: &str) -> Self {
        Self::start_with(target, false).await
    }

    /// A proxy in chaos mode (see the module documentation).
    pub async fn start_chaos(target: &str) -> Self {
        Self::start_with(target, true).await
    }

    /// Ends chaos: connections from now on live and pass data plainly.
    pub fn calm(&self) {
        self.chaos.store(false, Ordering::SeqCst);
    }

    async fn start_with(target: &str, chaos_on: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let chaos = Arc::new(AtomicBool::new(chaos_on));
        let broken = Arc::new(AtomicUsize::new(0));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let target = target.to_string();
        let (d, c) = (down.clone(), conns.clone());
        let (ch, br) = (chaos.clone(), broken.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let (chaos, broken) = (ch.clone(), br.clone());
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        if chaos.load(Ordering::SeqCst) {
                            chaotic(inbound, outbound, chaos, broken).await;
                        } else {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Self {
            addr,
            down,
            chaos,
            broken,
            conns,
            accept,
        }
    }

    /// Drops every open connection (both sides see the socket close).
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
