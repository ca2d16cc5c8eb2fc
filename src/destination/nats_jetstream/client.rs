//! The NATS connection and the JetStream publish.

use async_nats::jetstream::{self, stream};

use super::{JetStreamError, NatsJetStreamConfig, encode};
use crate::destination::OutgoingRecord;
use crate::destination::reconnect::{ConnectFailure, Reconnect};

pub struct Client {
    config: NatsJetStreamConfig,
    conn: Reconnect<jetstream::Context>,
}

impl Client {
    pub fn new(config: NatsJetStreamConfig) -> Self {
        Self {
            config,
            conn: Reconnect::default(),
        }
    }

    async fn context(&self) -> Result<jetstream::Context, JetStreamError> {
        let timeout = self.config.ack_timeout;
        self.conn
            .get(|| async {
                let client = self
                    .config
                    .connection
                    .connect()
                    .await
                    .map_err(JetStreamError::Connect)?;
                let mut context = jetstream::new(client);
                context.set_timeout(timeout);
                if self.config.create_stream {
                    // Before the first publish, so records never race the
                    // start check into a missing stream.
                    self.create_stream(&context).await?;
                }
                Ok(context)
            })
            .await
            .map_err(|e| match e {
                ConnectFailure::Paused(d, why) => JetStreamError::Paused(d, why),
                ConnectFailure::Failed(e) => e,
            })
    }

    pub async fn publish(&self, record: &OutgoingRecord) -> Result<(), JetStreamError> {
        let js = self.context().await?;
        // async-nats reconnects by itself; the context stays valid.
        let ack = js
            .send_publish(self.config.subject.clone(), encode::publish(record))
            .await
            .map_err(JetStreamError::Publish)?;
        // A duplicate ack means the stream already holds this record id.
        match ack.await {
            Ok(_) => Ok(()),
            // No ack because the connection is down (the server restarting):
            // the destination's failure, not a send that used an attempt.
            Err(e)
                if js.client().connection_state() != async_nats::connection::State::Connected =>
            {
                Err(JetStreamError::Disconnected(e))
            }
            Err(e) => Err(JetStreamError::Publish(e)),
        }
    }

    async fn create_stream(&self, js: &jetstream::Context) -> Result<(), JetStreamError> {
        let Some(name) = &self.config.stream else {
            return Ok(());
        };
        js.get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![self.config.subject.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|e| JetStreamError::Stream {
            stream: name.clone(),
            reason: format!("cannot create it: {e}"),
        })
    }

    /// Checks the stream exists and captures the subject; with
    /// `create_stream`, creates it only when `declare` (a missing stream
    /// that would be created passes).
    pub async fn check(&self, declare: bool) -> Result<(), JetStreamError> {
        let Some(name) = &self.config.stream else {
            return Ok(());
        };
        let js = self.context().await?;
        let err = |reason: String| JetStreamError::Stream {
            stream: name.clone(),
            reason,
        };
        if self.config.create_stream && declare {
            return self.create_stream(&js).await;
        }
        let mut s = match js.get_stream(name).await {
            Ok(s) => s,
            Err(e)
                if self.config.create_stream
                    && matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                // Missing: created at start (create_stream = true).
                return Ok(());
            }
            Err(e) => {
                return Err(err(format!(
                    "does not exist or cannot be read ({e}); set create_stream = true to create it"
                )));
            }
        };
        let info = s.info().await.map_err(|e| err(e.to_string()))?;
        let captures = info
            .config
            .subjects
            .iter()
            .any(|pattern| subject_matches(pattern, &self.config.subject));
        if !captures {
            return Err(err(format!(
                "does not capture subject `{}` (its subjects: {:?})",
                self.config.subject, info.config.subjects
            )));
        }
        Ok(())
    }
}

/// NATS subject matching with `*` and `>` wildcards.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn wildcards() {
        assert!(subject_matches("fn.>", "fn.results.x"));
        assert!(subject_matches("fn.*", "fn.results"));
        assert!(!subject_matches("fn.*", "fn.results.x"));
        assert!(subject_matches("fn.results", "fn.results"));
        assert!(!subject_matches("other", "fn.results"));
    }
}
