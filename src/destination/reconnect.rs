//! A lazily built, shared connection that is thrown away after a broker
//! error and rebuilt on the next send, with a growing pause between failed
//! attempts so a dead broker is not hammered (the dispatcher's backoff
//! spaces the records; this spaces the connects).

use std::future::Future;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(5);

struct State<C> {
    conn: Option<C>,
    failures: u32,
    next_try: Option<Instant>,
    /// Why the last connect failed (its whole cause chain).
    last_error: String,
}

/// Why no connection was handed out.
#[derive(Debug)]
pub enum ConnectFailure<E> {
    /// The last connect failed moments ago; not retried yet. Carries how
    /// long until the next try and why the last one failed.
    Paused(Duration, String),
    /// Connecting failed now.
    Failed(E),
}

/// One shared connection (any cheap-to-clone handle).
pub struct Reconnect<C> {
    state: Mutex<State<C>>,
}

impl<C: Clone> Default for Reconnect<C> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                conn: None,
                failures: 0,
                next_try: None,
                last_error: String::new(),
            }),
        }
    }
}

impl<C: Clone> Reconnect<C> {
    /// The current connection, or a new one from `connect`. Only one
    /// connect runs at a time; concurrent callers wait for its result.
    pub async fn get<F, Fut, E>(&self, connect: F) -> Result<C, ConnectFailure<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
        E: std::error::Error + 'static,
    {
        let mut state = self.state.lock().await;
        if let Some(conn) = &state.conn {
            return Ok(conn.clone());
        }
        let now = Instant::now();
        if let Some(next) = state.next_try
            && now < next
        {
            return Err(ConnectFailure::Paused(next - now, state.last_error.clone()));
        }
        match connect().await {
            Ok(conn) => {
                state.conn = Some(conn.clone());
                state.failures = 0;
                state.next_try = None;
                Ok(conn)
            }
            Err(e) => {
                let pause = FIRST_PAUSE
                    .saturating_mul(1 << state.failures.min(10))
                    .min(MAX_PAUSE);
                state.failures += 1;
                state.next_try = Some(Instant::now() + pause);
                state.last_error = crate::logging::Chain(&e).to_string();
                Err(ConnectFailure::Failed(e))
            }
        }
    }

    /// Drops the connection so the next `get` reconnects.
    pub async fn reset(&self) {
        self.state.lock().await.conn = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failed_connects_pause_and_success_is_shared() {
        let r: Reconnect<u32> = Reconnect::default();
        let refused = || std::io::Error::other("refused");
        let got = r.get(|| async { Err::<u32, _>(refused()) }).await;
        assert!(matches!(got, Err(ConnectFailure::Failed(_))));
        let got = r.get(|| async { Ok::<u32, std::io::Error>(1) }).await;
        match got {
            Err(ConnectFailure::Paused(_, why)) => assert_eq!(why, "refused", "says why"),
            _ => panic!("paused after a failure"),
        }
        tokio::time::advance(FIRST_PAUSE).await;
        assert_eq!(
            r.get(|| async { Ok::<u32, std::io::Error>(7) })
                .await
                .unwrap(),
            7
        );
        assert_eq!(
            r.get(|| async { Ok::<u32, std::io::Error>(8) })
                .await
                .unwrap(),
            7,
            "reused"
        );
        r.reset().await;
        assert_eq!(
            r.get(|| async { Ok::<u32, std::io::Error>(9) })
                .await
                .unwrap(),
            9
        );
    }
}
