//! Record -> JetStream publish.

use async_nats::jetstream::message::PublishMessage;

use crate::destination::OutgoingRecord;

/// Header carrying the stream key (functionId).
pub const KEY_HEADER: &str = "Fnrelay-Key";

/// `Nats-Msg-Id` = record id (server dedup), key header, JSON payload.
pub fn publish(record: &OutgoingRecord) -> PublishMessage {
    let mut message = PublishMessage::build()
        .payload(record.body.clone())
        .message_id(&record.id)
        .header(KEY_HEADER, record.function_id.as_str())
        .header("Content-Type", record.content_type);
    // CloudEvents binary mode: the attributes as `ce-` headers.
    if let Some(ce) = &record.cloudevent {
        for (name, value) in ce.pairs() {
            if name != "datacontenttype" {
                message = message.header(format!("ce-{name}").as_str(), value.as_str());
            }
        }
    }
    message
}
