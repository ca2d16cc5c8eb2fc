//! Packs records that workers send concurrently into one request, within a
//! service's count and size limits, and hands each worker its own record's
//! result. Under load, requests fill up while earlier ones are in flight;
//! a lone record goes out alone at once (no waiting timer).

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::destination::OutgoingRecord;
use crate::error::{DeliveryError, ErrorLabel};

/// A service API that takes several records per request.
#[async_trait]
pub trait BatchSink: Send + Sync + 'static {
    /// Most records in one request.
    fn max_records(&self) -> usize;
    /// Most bytes in one request, as [`BatchSink::size`] counts them.
    fn max_bytes(&self) -> usize;
    /// What a record adds to a request.
    fn size(&self, record: &OutgoingRecord) -> usize;
    /// Records with different keys never share a request (e.g. channels).
    fn key(&self, record: &OutgoingRecord) -> Option<String>;
    /// One request; one result per record, in order.
    async fn send(&self, records: Vec<OutgoingRecord>) -> Vec<Result<(), DeliveryError>>;
}

struct Item {
    record: OutgoingRecord,
    done: oneshot::Sender<Result<(), DeliveryError>>,
}

/// The batching front of a [`BatchSink`].
pub struct Batcher {
    sink: Arc<dyn BatchSink>,
    concurrency: usize,
    tx: OnceLock<mpsc::UnboundedSender<Item>>,
}

impl Batcher {
    /// At most `concurrency` requests in flight.
    pub fn new(sink: Arc<dyn BatchSink>, concurrency: usize) -> Self {
        Self {
            sink,
            concurrency: concurrency.max(1),
            tx: OnceLock::new(),
        }
    }

    /// Sends one record as part of the next request; returns its own result.
    pub async fn submit(&self, record: OutgoingRecord) -> Result<(), DeliveryError> {
        // Started on first use, inside the runtime.
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(self.sink.clone(), rx, self.concurrency));
            tx
        });
        let (done, result) = oneshot::channel();
        tx.send(Item { record, done })
            .map_err(|_| DeliveryError::retry(ErrorLabel::Other, "batcher stopped"))?;
        result.await.unwrap_or_else(|_| {
            Err(DeliveryError::retry(
                ErrorLabel::Other,
                "batcher dropped the record",
            ))
        })
    }
}

async fn run(sink: Arc<dyn BatchSink>, mut rx: mpsc::UnboundedReceiver<Item>, concurrency: usize) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut carry: Option<Item> = None;
    loop {
        let first = match carry.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => return,
            },
        };
        // Wait for a free request slot first: records keep queueing
        // meanwhile, so the next request is fuller under load.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let key = sink.key(&first.record);
        let mut bytes = sink.size(&first.record);
        let mut items = vec![first];
        while items.len() < sink.max_records() {
            match rx.try_recv() {
                Ok(next) => {
                    let size = sink.size(&next.record);
                    if sink.key(&next.record) != key || bytes + size > sink.max_bytes() {
                        carry = Some(next);
                        break;
                    }
                    bytes += size;
                    items.push(next);
                }
                Err(_) => break,
            }
        }
        let sink = sink.clone();
        tokio::spawn(async move {
            let (records, waiters): (Vec<_>, Vec<_>) =
                items.into_iter().map(|i| (i.record, i.done)).unzip();
            let n = records.len();
            let mut results = sink.send(records).await.into_iter();
            for (i, done) in waiters.into_iter().enumerate() {
                let r = results.next().unwrap_or_else(|| {
                    Err(DeliveryError::retry(
                        ErrorLabel::ServerError,
                        format!("no result for entry {i} of {n}"),
                    ))
                });
                let _ = done.send(r);
            }
            drop(permit);
        });
    }
}
