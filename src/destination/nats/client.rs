//! The NATS connection, publish and flush.

use std::time::Duration;

use super::{NatsConfig, NatsError, encode};
use crate::destination::OutgoingRecord;
use crate::destination::reconnect::{ConnectFailure, Reconnect};

const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Client {
    config: NatsConfig,
    conn: Reconnect<async_nats::Client>,
}

impl Client {
    pub fn new(config: NatsConfig) -> Self {
        Self {
            config,
            conn: Reconnect::default(),
        }
    }

    pub async fn publish(&self, record: &OutgoingRecord) -> Result<(), NatsError> {
        let client = self
            .conn
            .get(|| self.config.connection.connect())
            .await
            .map_err(|e| match e {
                ConnectFailure::Paused(d) => NatsError::Paused(d),
                ConnectFailure::Failed(e) => NatsError::Connect(e),
            })?;
        let headers = encode::headers(record);
        let max = client.server_info().max_payload;
        let size = record.body.len() + 128;
        if max > 0 && size > max {
            return Err(NatsError::TooLarge { size, max });
        }
        client
            .publish_with_headers(self.config.subject.clone(), headers, record.body.clone())
            .await
            .map_err(NatsError::Publish)?;
        match tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NatsError::Flush(e)),
            Err(_) => Err(NatsError::FlushTimeout),
        }
    }
}
