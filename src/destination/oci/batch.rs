//! Packs a lane's batch into as few requests as a service's count, size
//! and key limits allow, sends them concurrently, and gives every record its
//! own result. There is no background batcher: the lane's batch (SPEC
//! section 10) is the unit.

use async_trait::async_trait;

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

/// Sends `records` in packed requests; one result per record, in order.
/// Records with different keys never share a request.
pub async fn send_packed(
    sink: &dyn BatchSink,
    records: Vec<OutgoingRecord>,
) -> Vec<Result<(), DeliveryError>> {
    let n = records.len();
    // (request records, their positions in the batch, key, bytes)
    type Request = (Vec<OutgoingRecord>, Vec<usize>, Option<String>, usize);
    let mut requests: Vec<Request> = Vec::new();
    for (pos, record) in records.into_iter().enumerate() {
        let key = sink.key(&record);
        let size = sink.size(&record);
        let open = requests.iter_mut().find(|(r, _, k, bytes)| {
            *k == key && r.len() < sink.max_records() && *bytes + size <= sink.max_bytes()
        });
        match open {
            Some((r, positions, _, bytes)) => {
                r.push(record);
                positions.push(pos);
                *bytes += size;
            }
            None => requests.push((vec![record], vec![pos], key, size)),
        }
    }
    let sent = futures_util::future::join_all(
        requests
            .into_iter()
            .map(|(r, positions, _, _)| async move { (sink.send(r).await, positions) }),
    )
    .await;
    let mut out: Vec<Option<Result<(), DeliveryError>>> = (0..n).map(|_| None).collect();
    for (results, positions) in sent {
        let m = positions.len();
        let mut results = results.into_iter();
        for (i, pos) in positions.into_iter().enumerate() {
            out[pos] = Some(results.next().unwrap_or_else(|| {
                Err(DeliveryError::retry(
                    ErrorLabel::ServerError,
                    format!("no result for entry {i} of {m}"),
                ))
            }));
        }
    }
    out.into_iter()
        .map(|r| r.expect("every position is filled"))
        .collect()
}

/// Fits each record (`fit` may truncate it or refuse it as too large),
/// sends the ones that fit packed, and merges the results in order.
pub async fn send_fitted<F>(
    sink: &dyn BatchSink,
    records: &[OutgoingRecord],
    fit: F,
) -> Vec<Result<(), DeliveryError>>
where
    F: Fn(&OutgoingRecord) -> Result<OutgoingRecord, DeliveryError>,
{
    let mut out: Vec<Option<Result<(), DeliveryError>>> = Vec::with_capacity(records.len());
    let mut fitted = Vec::new();
    let mut positions = Vec::new();
    for (pos, r) in records.iter().enumerate() {
        match fit(r) {
            Ok(f) => {
                fitted.push(f);
                positions.push(pos);
                out.push(None);
            }
            Err(e) => out.push(Some(Err(e))),
        }
    }
    let results = send_packed(sink, fitted).await;
    for (pos, r) in positions.into_iter().zip(results) {
        out[pos] = Some(r);
    }
    out.into_iter()
        .map(|r| r.expect("every position is filled"))
        .collect()
}
