//! The NATS connection, the publish, and its confirmation.
//!
//! Core NATS has no ack, and `flush` only means "written to the socket".
//! To know the server has processed a batch, its publishes are followed by
//! one marker published to an inbox this connection subscribes to: the
//! server handles one connection's messages in order, so the marker coming
//! back proves the records before it were processed (and passed to every
//! subscriber connected at that moment). No marker within the timeout: the
//! record is retried (a duplicate with the same id, never a loss).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Mutex, oneshot};

use super::{NatsConfig, NatsError, encode};
use crate::destination::OutgoingRecord;
use crate::destination::reconnect::{ConnectFailure, Reconnect};

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

#[derive(Clone)]
struct Conn {
    client: async_nats::Client,
    inbox: async_nats::Subject,
    waiters: Waiters,
    next: Arc<AtomicU64>,
}

pub struct Client {
    config: NatsConfig,
    conn: Reconnect<Conn>,
}

impl Client {
    pub fn new(config: NatsConfig) -> Self {
        Self {
            config,
            conn: Reconnect::default(),
        }
    }

    async fn connect(&self) -> Result<Conn, NatsError> {
        let client = self
            .config
            .connection
            .connect()
            .await
            .map_err(NatsError::Connect)?;
        let inbox = async_nats::Subject::from(client.new_inbox());
        let mut markers = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| NatsError::Subscribe(e.to_string()))?;
        let waiters: Waiters = Arc::default();
        let sink = waiters.clone();
        // Lives as long as the client (async-nats resubscribes after reconnects).
        tokio::spawn(async move {
            while let Some(m) = markers.next().await {
                let token = std::str::from_utf8(&m.payload)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok());
                if let Some(t) = token
                    && let Some(w) = sink.lock().await.remove(&t)
                {
                    let _ = w.send(());
                }
            }
        });
        Ok(Conn {
            client,
            inbox,
            waiters,
            next: Arc::default(),
        })
    }

    /// Publishes `records` and one marker after them; the marker coming
    /// back confirms every one of them. Returns, per record, the error that
    /// is its own (over `max_payload`), and the outcome shared by the
    /// others.
    pub async fn publish_many(
        &self,
        records: &[OutgoingRecord],
    ) -> (Vec<Option<NatsError>>, Result<(), NatsError>) {
        let mut own: Vec<Option<NatsError>> = records.iter().map(|_| None).collect();
        let conn = match self.conn.get(|| self.connect()).await {
            Ok(c) => c,
            Err(ConnectFailure::Paused(d, why)) => return (own, Err(NatsError::Paused(d, why))),
            Err(ConnectFailure::Failed(e)) => return (own, Err(e)),
        };
        let client = &conn.client;
        let max = client.server_info().max_payload;
        let token = conn.next.fetch_add(1, Ordering::Relaxed);
        let (done, confirmed) = oneshot::channel();
        conn.waiters.lock().await.insert(token, done);
        let sent = async {
            for (record, own) in records.iter().zip(own.iter_mut()) {
                let size = record.body.len() + 128;
                if max > 0 && size > max {
                    *own = Some(NatsError::TooLarge { size, max });
                    continue;
                }
                client
                    .publish_with_headers(
                        self.config.subject.clone(),
                        encode::headers(record),
                        record.body.clone(),
                    )
                    .await?;
            }
            client
                .publish(conn.inbox.clone(), token.to_string().into())
                .await?;
            Ok::<(), async_nats::PublishError>(())
        }
        .await;
        if let Err(e) = sent {
            conn.waiters.lock().await.remove(&token);
            return (own, Err(NatsError::Publish(e)));
        }
        if let Err(e) = client.flush().await {
            conn.waiters.lock().await.remove(&token);
            return (own, Err(NatsError::Flush(e)));
        }
        let shared = match tokio::time::timeout(CONFIRM_TIMEOUT, confirmed).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                conn.waiters.lock().await.remove(&token);
                Err(NatsError::NotConfirmed)
            }
        };
        (own, shared)
    }
}
