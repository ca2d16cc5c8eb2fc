//! The Redis connection manager and XADD.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{RedisStreamsConfig, RedisStreamsError, encode};
use crate::destination::OutgoingRecord;
use crate::destination::reconnect::{ConnectFailure, Reconnect};

pub struct Client {
    redis: redis::Client,
    config: RedisStreamsConfig,
    conn: Reconnect<ConnectionManager>,
}

impl Client {
    pub fn new(redis: redis::Client, config: RedisStreamsConfig) -> Self {
        Self {
            redis,
            config,
            conn: Reconnect::default(),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, RedisStreamsError> {
        let settings = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.timeout))
            .set_response_timeout(Some(self.config.timeout))
            .set_number_of_retries(2);
        self.conn
            .get(|| ConnectionManager::new_with_config(self.redis.clone(), settings))
            .await
            .map_err(|e| match e {
                ConnectFailure::Paused(d, why) => RedisStreamsError::Paused(d, why),
                ConnectFailure::Failed(e) => RedisStreamsError::Connect(e),
            })
    }

    pub async fn xadd(&self, record: &OutgoingRecord) -> Result<(), RedisStreamsError> {
        let mut conn = self.connection().await?;
        let cmd = encode::xadd(&self.config.stream_key, self.config.maxlen, record);
        let result: Result<String, _> = cmd.query_async(&mut conn).await;
        match result {
            Ok(_entry) => Ok(()),
            Err(e) => {
                if must_reconnect(&e) {
                    // A timeout, or a node that is no longer (or not yet)
                    // the primary: build a new connection, which resolves
                    // the address again and reaches the promoted node.
                    self.conn.reset().await;
                }
                Err(RedisStreamsError::Command(e))
            }
        }
    }

    /// XADDs a batch in one pipeline: one round trip, one result per
    /// record. `Err` when the pipeline as a whole failed (connection).
    pub async fn xadd_batch(
        &self,
        records: &[OutgoingRecord],
    ) -> Result<Vec<Result<(), RedisStreamsError>>, RedisStreamsError> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for r in records {
            pipe.add_command(encode::xadd(&self.config.stream_key, self.config.maxlen, r));
        }
        let answered: Result<Vec<redis::RedisResult<String>>, _> =
            pipe.query_async(&mut conn).await;
        let per = match answered {
            Ok(per) if per.len() == records.len() => per,
            Ok(per) => {
                self.conn.reset().await;
                return Err(RedisStreamsError::Answers {
                    got: per.len(),
                    sent: records.len(),
                });
            }
            Err(e) => {
                if must_reconnect(&e) {
                    self.conn.reset().await;
                }
                return Err(RedisStreamsError::Command(e));
            }
        };
        if per
            .iter()
            .any(|r| r.as_ref().err().is_some_and(must_reconnect))
        {
            self.conn.reset().await;
        }
        Ok(per
            .into_iter()
            .map(|r| r.map(|_entry| ()).map_err(RedisStreamsError::Command))
            .collect())
    }

    /// Connects and checks the key is a stream or absent.
    pub async fn check(&self) -> Result<(), RedisStreamsError> {
        let mut conn = self.connection().await?;
        let kind: String = redis::cmd("TYPE")
            .arg(&self.config.stream_key)
            .query_async(&mut conn)
            .await
            .map_err(RedisStreamsError::Command)?;
        if kind == "stream" || kind == "none" {
            Ok(())
        } else {
            Err(RedisStreamsError::WrongType {
                key: self.config.stream_key.clone(),
                kind,
            })
        }
    }
}

/// Errors after which the connection is not reused.
fn must_reconnect(e: &redis::RedisError) -> bool {
    e.is_timeout()
        || e.is_connection_dropped()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}
