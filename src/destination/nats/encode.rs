//! Record -> core NATS headers.

use async_nats::HeaderMap;

use crate::destination::OutgoingRecord;

/// `Nats-Msg-Id` = record id, the key, the content type.
pub fn headers(record: &OutgoingRecord) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", record.id.as_str());
    h.insert("Fnrelay-Key", record.function_id.as_str());
    h.insert("Content-Type", record.content_type);
    // CloudEvents binary mode: the attributes as `ce-` headers.
    if let Some(ce) = &record.cloudevent {
        for (name, value) in ce.pairs() {
            if name != "datacontenttype" {
                h.insert(format!("ce-{name}").as_str(), value.as_str());
            }
        }
    }
    h
}
