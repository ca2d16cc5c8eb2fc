//! Record -> core NATS headers.

use async_nats::HeaderMap;

use crate::destination::OutgoingRecord;

/// `Nats-Msg-Id` = record id, the key, the content type.
pub fn headers(record: &OutgoingRecord) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", record.id.as_str());
    h.insert("Fnrelay-Key", record.function_id.as_str());
    h.insert("Content-Type", "application/json");
    h
}
